"""kdflow's pure core: config, models, losses, training, eval and evidence. Never imports prefect."""

__version__ = "0.1.0"
