"""Input pipelines: sources (tfds, MAE folder layout, bundled demo photos,
synthetic), host-side transforms in tf.data, per-process sharding, and
mixup/cutmix on the accelerator.

TensorFlow is imported lazily by the modules that need it (`pipeline`,
`transforms`, `randaugment`, `sources` for tfds), never by `import sbam_jax`,
and it never sees a GPU.
"""
