"""Mail authentication: DKIM signing, and SPF, DKIM and DMARC checks of inbound mail (docs/authentication.rst)."""
