"""Async jobs: requests that wait out 429s in a Durable Functions orchestration (job documents, the orchestrator, the start queue, and running a job's steps)."""
