"""Ray Serve: the OpenAI-compatible API in front of diffusion-LM replicas.

- app.py: `build_app(args)`, the builder serve_config.yaml imports (pydantic args, typos fail)
- protocol.py: OpenAI request/response models plus the diffusion extensions
- openai_api.py: the FastAPI app (buildable without Serve, over any Backend) and its
  `OpenAIIngress` deployment
- server.py: the `ModelServer` deployment (model + engine per replica) and `RayBackend`, the
  ingress' client of it
- router.py: the step router (denoising steps from the cluster load, with hysteresis) and the
  LoadBoard deployment the replicas report to
- routing.py: `LeastBacklogRouter`, the replica request router (least token backlog)
"""
