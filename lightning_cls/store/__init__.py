"""The service's state, shared by every process and command that reads it: predictions, feedback, kept texts,
shadow answers and the deployment history (`feedback_store`)."""
