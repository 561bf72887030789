"""One thin Prefect task per DAG step: retries, cache policy and artifacts. Logic lives in `kd/`."""

import kd  # noqa: E402,F401 - sets the OpenMP wait policy before anything here loads torch
