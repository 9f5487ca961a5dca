"""Answer and retrieval metrics, and the batch evaluation job."""
