"""Sekisho: a company's own gateway in front of Azure OpenAI.

The package is laid out along the request path; see docs/architecture.md.
"""
