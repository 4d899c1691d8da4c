"""What users run outside a run: the flowertune command, deployment, credentials, reports, chat, export, plot."""
