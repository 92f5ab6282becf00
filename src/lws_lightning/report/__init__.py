"""Tables and figures over finished runs."""
