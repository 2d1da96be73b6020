"""The local host: serves the HTTP functions registered in function_app.py, without Core Tools."""
