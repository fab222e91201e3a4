# syntax=docker/dockerfile:1
# The tgastream application image: worker, trainer, API and CLI (one image, the command picks the role).
#
#   docker build -t tgastream:cuda .                          # CUDA torch (PyPI's default Linux wheel)
#   docker build -t tgastream:cpu --build-arg VARIANT=cpu .   # CPU-only torch: no CUDA libraries
#   docker run --rm tgastream:cpu doctor                      # first command: which paths this image runs
#
# Installed by deploy/install-wheel, the same script CI's wheel check (.ci/wheel-check) runs: build the
# wheel, fresh virtualenv, torch==2.13.0 first, then the wheel. The build stage has gcc and compiles the
# fused TGA kernel once (`doctor --require-fused`: no kernel, no image); the runtime stage has no
# compiler and loads that portable (x86-64-v2) build from TGA_KERNEL_CACHE, checked again below.
ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS build
ARG VARIANT=cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY state ./state
COPY model ./model
COPY stream ./stream
COPY bench ./bench
COPY deploy/install-wheel ./deploy/install-wheel
RUN case "$VARIANT" in cpu) torch=cpu ;; cuda) torch=default ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;; esac \
 && deploy/install-wheel /src /opt/tgastream/venv "$torch"
ENV PATH=/opt/tgastream/venv/bin:$PATH TGA_KERNEL_CACHE=/opt/tgastream/kernels
RUN tgastream doctor --require-fused

FROM python:${PYTHON}-slim
ARG VARIANT=cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/tgastream/venv/bin:$PATH TGA_KERNEL_CACHE=/opt/tgastream/kernels
# libgomp1: the OpenMP runtime the kernel links against (the compiler stays in the build stage)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/tgastream /opt/tgastream
RUN useradd --create-home --uid 10001 tgastream && mkdir -p /data && chown tgastream /data
USER tgastream
ENV TGASTREAM_DATA_DIR=/data
RUN tgastream doctor --require-fused
LABEL org.opencontainers.image.title="tgastream" tgastream.variant="$VARIANT"
VOLUME ["/data"]
ENTRYPOINT ["tgastream"]
CMD ["doctor"]
