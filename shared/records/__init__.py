"""What a request leaves behind: the request log record and its writer, usage roll-ups, telemetry, and the rule that no credential is stored."""
