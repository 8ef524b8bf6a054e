"""Ray Serve: the OpenAI-compatible API in front of diffusion-LM replicas.

A request's path, file by file:
- ingress.py: the FastAPI app (buildable without Serve, over any backend) and its
  `OpenAIIngress` deployment; protocol.py holds the OpenAI request/response models with the
  diffusion extensions, errors.py the OpenAI error envelope
- openai_service.py: checks, admission and the answer (JSON or SSE) of one request;
  jobs.py turns it into engine requests (tokenize, FIM, token healing, context limits)
- step_router.py: the threshold ladder of denoising steps per block (with hysteresis and a
  burst ledger); slo.py, the latency-target step controller that replaces it by default, valuing
  rungs with quality_table.py (the model's `dllm eval` table); load_board.py, the LoadBoard
  deployment the replicas report their load to
- backends.py: where engine requests go, an engine in this process or the replicas through
  DeploymentHandles; streams.py fans in the events of several choices
- replica_router.py: `LeastBacklogRouter`, which picks the replica with the least token backlog
- replica.py: the `ModelServer` deployment (model + engine per replica); tensor_parallel.py,
  the rank actors of a replica spread over several GPUs
- app.py: `build_app(args)`, the builder serve_config.yaml imports; config.py validates its
  args once (unknown keys are errors) into the AppArgs every deployment reads
- metrics.py: the Serve metrics of the deployments, built from monitoring/metrics.py
"""
