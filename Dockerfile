# The tgastream application image: worker, trainer, API and CLI (one image, the command picks the role).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# torch first and pinned: the default wheel on Linux is a CUDA build (what a GPU trainer wants);
# pass --build-arg TORCH_SPEC="torch==2.13.0+cpu" with a CPU wheel index for a smaller image.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY stream ./stream
COPY state ./state
COPY model ./model
COPY core ./core
COPY bench ./bench
RUN pip install .

RUN useradd --create-home --uid 10001 tgastream && mkdir -p /data && chown tgastream /data
USER tgastream
ENV TGASTREAM_DATA_DIR=/data
VOLUME ["/data"]
ENTRYPOINT ["tgastream"]
CMD ["--help"]
