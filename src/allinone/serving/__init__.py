"""The serving layer: between the HTTP routes (and the CLI) and the task and decision services.

One module per role: ``errors`` (the one input error), ``scope`` (a request's deadline, drain
and hang-up, and the engine handles it started), ``events`` (typed engine events), ``sse`` (the
one Server-Sent Events encoder), ``models`` (a request's ``model`` to a task), and a serving
class per API family (``chat``, ...). Routes only parse the wire body and call these. This
package imports nothing at import time, so low-level modules may import its ``errors``.
"""
