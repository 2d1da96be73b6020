"""What only runs locally, never in the deployed package (.funcignore): the local Functions host, the Azure OpenAI simulator, and the local token issuer."""
