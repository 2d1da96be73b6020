"""Who is calling: the authenticate stage, Entra ID token validation, Easy Auth principals."""
