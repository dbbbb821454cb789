"""
The twistd plugin: C{twistd -n mailhub [--config FILE]}.

Owns: nothing but the L{ServiceMaker}.  It names C{mailhub.tap} as a string
so that listing plugins (C{twistd --help}) does not import mailhub; the
options and the wiring live in mailhub/tap.py.

This directory deliberately has no C{__init__.py}: Twisted's own
C{twisted/plugins/__init__.py} extends its C{__path__} with every
C{twisted/plugins} directory on C{sys.path}, so this file is found both when
mailhub is pip-installed (it lands in site-packages/twisted/plugins/) and
when C{PYTHONPATH} points at a source checkout.
"""

from twisted.application.service import ServiceMaker

mailhub = ServiceMaker(
    "mailhub",
    "mailhub.tap",
    "mailhub mail transfer agent: ESMTP server, durable spool, Maildir delivery",
    "mailhub",
)
