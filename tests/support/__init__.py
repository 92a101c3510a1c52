"""Helpers the tests share: live servers, the TCP proxy, the browser, the reliability
figures, the test apps, and the constants and readers in :mod:`support.common`."""
