"""Offline data preparation: webdataset shard writing, machine translation, validation reports."""
