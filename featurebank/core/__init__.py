"""The core layer every other layer imports: errors, the spec, the bank directory and its
generations, the shared vocabulary and the parameter types. Nothing here imports TensorFlow,
FAISS, LMDB or gRPC."""
