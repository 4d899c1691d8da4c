"""The server side: the strategy and its privacy wrappers, reply checks, results, resume, server evaluation."""
