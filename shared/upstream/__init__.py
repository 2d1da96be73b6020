"""The call to Azure OpenAI: backends and their health, upstream authentication, retries, the stream relay and the streaming response."""
