"""Delivery to other hosts: next hops, MX resolution, connections and the SMTP client."""
