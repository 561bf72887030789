"""One thin Prefect task per DAG step: retries, cache policy and artifacts. Logic lives in `kd/`."""
