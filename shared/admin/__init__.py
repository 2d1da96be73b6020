"""The admin side: the admin HTTP API and page, its sign-in sessions and charts, and the command line."""
