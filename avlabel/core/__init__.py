"""What every command shares: the label schema, prompts, frame sampling, input layouts, records and loading."""
