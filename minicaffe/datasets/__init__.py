"""Dataset tools: MNIST download/conversion and image folders to Caffe databases.

Everything here writes or reads Caffe's own formats (LMDB of Datum records,
BlobProto mean files), so the results work with Caffe and minicaffe alike.
"""
