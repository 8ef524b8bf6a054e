# Image for the RayService pods (k8s/): the Ray base image, same Ray and Python as the project
# pins (ray[serve]==2.60.0, Python 3.11), plus this project installed as a package, so that the
# serve config's import paths (deployments.app:build_app, autoscaling.policy:TokenBacklogPolicy)
# resolve on every node. Model weights other than the embedded tiny-coder come from a mounted
# volume at run time (k8s/rayservice-h100.yaml), never from the image.
#
#   GPU (H100, CUDA 12.8):
#     docker build -t REGISTRY/dllm-serve:0.1.0 .
#   CPU demo:
#     docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#         --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#         -t dllm-serve:0.1.0-cpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# torch from the PyTorch index matching the base image's CUDA (or the CPU index); the same
# version the project tests with.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
# Extra pip extras to install, e.g. "[gpu]" for flash-attn (needs a CUDA toolchain to build).
ARG EXTRAS=""

# OMP_WAIT_POLICY: CPU replicas step on a worker thread beside the event loop; spinning
# OpenMP workers would stall each step (dllm_cli.quiet_openmp_workers).
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE
WORKDIR /home/ray/dllm-serve

# Heavy dependencies first, in their own layers, so a code change does not reinstall them.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# deepspeed ships only an sdist whose setup imports torch: build it against the torch above.
RUN pip install --no-build-isolation "deepspeed>=0.15"

# The project: only what the package needs (no .venv, runs/, caches).
COPY --chown=ray:users pyproject.toml README.md dllm_cli.py serve_config.yaml serve_config.gpu.yaml ./
COPY --chown=ray:users model/ model/
COPY --chown=ray:users kernels/ kernels/
COPY --chown=ray:users engine/ engine/
COPY --chown=ray:users deployments/ deployments/
COPY --chown=ray:users autoscaling/ autoscaling/
COPY --chown=ray:users monitoring/ monitoring/
COPY --chown=ray:users benchmarks/ benchmarks/
# Ray and torch are already there; pip keeps them (ray[serve]==2.60.0 is the base image's).
RUN pip install ".${EXTRAS}" \
    && python -c "import deployments.app, autoscaling.policy, ray; assert ray.__version__ == '2.60.0', ray.__version__"

# Serve's HTTP proxy; the Ray ports (6379, 8265, 10001, 8080 metrics) are set up by KubeRay.
EXPOSE 8000
