"""The SMTP server: protocol, transaction, STARTTLS/AUTH, limits, parsing, relay policy."""
