import os

# Set before TensorFlow loads: no C++ start-up chatter, no GPU probing.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
