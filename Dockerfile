# The orchestrator against an external PostgreSQL (set DATABASE_URL, SAGA_ADMIN_TOKEN,
# SAGA_API_TOKEN and SAGA_ALLOWED_HOSTS: it refuses to listen off loopback without a
# strong admin token). The image holds the installed wheel, not a checkout, with its
# dependencies at the versions pinned in constraints.txt (`python3 tasks.py lock`).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY app ./app
COPY migrations ./migrations
COPY examples ./examples
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
COPY --from=build /src/constraints.txt /wheels/constraints.txt
RUN pip install --no-cache-dir -c /wheels/constraints.txt /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 saga
USER saga
WORKDIR /home/saga
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["saga-orchestrator", "serve", "--host", "0.0.0.0", "--port", "8000"]
