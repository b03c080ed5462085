"""What every command shares: the label schema, prompts and the conversation, frame sampling, input layouts,
caption records and their merge rule, problem reports, dataset loading, Markdown tables and storing files
(a hard link, else a copy)."""
