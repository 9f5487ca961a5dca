"""One module per `clara` sub-command; see clara_jax/cli.py."""
