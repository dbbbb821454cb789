"""The spool and everything that schedules, notifies about or feeds queued mail."""
