"""Resource planning: memory for any model shape on CPUs (this engine) or GPUs (vLLM), limits,
and deployment files (systemd, container, compose, Kubernetes, vLLM with Ray)."""
