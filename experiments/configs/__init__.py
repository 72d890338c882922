"""One ``get_config()`` per experiment, each starting from `fedsp.config.default_config`."""
