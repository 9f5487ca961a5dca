"""One module per `clara` sub-command; see clara_jax/cli.py.

Command modules import the library modules that load flax, optax, orbax or TensorFlow
(model, convert, train, index, infer, eval.job, export, aot, data.pipeline / tfds_build /
prepare) inside the function that needs them, so that `clara <command> --help` and a flag
error answer without loading them; light ones (config, fileio, workdir, errors, the data
formats, tokenizer and world, eval.report, commands.*) are imported at the top. `info` and
`convert` import the model at the top: all they do needs it."""
