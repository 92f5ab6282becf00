"""lws-lightning: learned weight sharing for deep multi-task learning."""

__version__ = "0.1.0"
