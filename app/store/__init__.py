"""The only package that speaks SQL: tables, repositories and transactions."""
