"""txsms."""
