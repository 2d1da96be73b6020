"""What an app may do: policy layers (defaults, app, user), the access stage, the app's system prompt, and the models list."""
