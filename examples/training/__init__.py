"""The training machinery shared by the example pipelines, one module per concern."""
