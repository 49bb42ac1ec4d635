"""This server as an OCI image: built with podman from a Debian base made by mmdebstrap, with no
registry and no network in the build (``allinone deploy image``; docs/scale-out.md)."""
