"""The milter client: mail filters (OpenDKIM, rspamd, ...) speaking the Sendmail/Postfix milter protocol."""
