# GPU image: NVIDIA's PyTorch container ships CUDA torch, Transformer Engine and apex.
#   docker build -t megatron-emo .
#   docker run --gpus all --ipc=host --rm -it -v /data:/data megatron-emo \
#       bash examples/02_train_emo_1b14b.sh        (DATA_PATH=..., NGPU=...)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-emo
COPY requirements.txt .
# Keep the container's own torch/numpy builds (they match its CUDA, TE and apex).
RUN grep -vE '^(torch|numpy)==' requirements.txt > /tmp/requirements.container.txt \
 && pip install --no-cache-dir -r /tmp/requirements.container.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

CMD ["python", "-m", "megatron_emo.train", "--help"]
