# Image for building and running TensorRT engines. No Docker engine runs on the development
# machines of this project, so this file is kept minimal and has not been built there.
FROM nvcr.io/nvidia/tensorrt:25.10-py3
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false CUDA_HOME=/usr/local/cuda
WORKDIR /opt/ssdopt
COPY . .
RUN pip install --no-cache-dir -e '.[tensorrt]' \
 && ssdopt plugin build --with-tensorrt
ENTRYPOINT ["ssdopt"]
