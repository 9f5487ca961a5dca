"""Data: tokenizers, prompt formats, the bundled knowledge world, reference-format readers,
TFDS builders (array_record, no TensorFlow) and grain pipelines.

Main entry points: `pipeline.make_loader(config, stage, data_dir)` (training batches),
`pipeline.read_rows(fmt, data_dir, split)` (rows for evaluation), `prepare.prepare_world`
(bundled data from nothing), `prompts` (prompt formats for training and inference).
"""
