"""memc test suite (a package so test modules and fixtures import as tests.*)."""
