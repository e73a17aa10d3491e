"""Key-value storage backends and the secret backends of the ``resource`` plugin. No policy."""
