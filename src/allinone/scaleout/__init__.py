"""Serving past one machine on an existing distributed engine.

``ray_config``: what a Ray Serve deployment of this server asks for (from the planner), the Serve
config file, the affinity key of a request and the gathering of every replica's metrics; it
imports no Ray. ``ray_serve``: the Serve deployments and the request router; it needs
``ray[serve]`` (requirements-ray.txt).
"""
