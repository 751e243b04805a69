#!/usr/bin/env bash
# Registers the ZenML stack for SageMaker: S3 artifact store, SageMaker orchestrator and GPU step
# operator, ECR container registry, AWS CodeBuild image builder (no local Docker), MLflow experiment
# tracker and model registry on a remote tracking server. Every value comes from the environment
# or flags; nothing account-specific is written here.
#
#   scripts/register_sagemaker_stack.sh [--dry-run] [--stack NAME]
#
# Required environment:
#   AWS_REGION                  e.g. eu-west-1
#   XRAY_ARTIFACT_BUCKET        S3 bucket for ZenML artifacts (s3://BUCKET/zenml)
#   XRAY_SAGEMAKER_ROLE_ARN     execution role for SageMaker jobs
#   XRAY_ECR_REGISTRY           ACCOUNT.dkr.ecr.REGION.amazonaws.com
#   XRAY_CODEBUILD_PROJECT      an existing AWS CodeBuild project for image builds
#   MLFLOW_TRACKING_URI         the MLflow tracking server (URL or SageMaker MLflow ARN)
# Optional:
#   XRAY_SCHEDULER_ROLE_ARN     role EventBridge Scheduler assumes for scheduled runs
set -euo pipefail

dry_run=0
stack="xray-sagemaker"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --stack) stack="${2:?--stack needs a name}"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "error: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

missing=()
for name in AWS_REGION XRAY_ARTIFACT_BUCKET XRAY_SAGEMAKER_ROLE_ARN XRAY_ECR_REGISTRY XRAY_CODEBUILD_PROJECT MLFLOW_TRACKING_URI; do
  [ -n "${!name:-}" ] || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: missing environment variables: ${missing[*]} (see docs/sagemaker.md)" >&2
  exit 2
fi
[[ "$XRAY_SAGEMAKER_ROLE_ARN" =~ ^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+ ]] || { echo "error: XRAY_SAGEMAKER_ROLE_ARN is not an IAM role ARN: $XRAY_SAGEMAKER_ROLE_ARN" >&2; exit 2; }
[[ "$XRAY_ECR_REGISTRY" =~ ^[0-9]{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com$ ]] || { echo "error: XRAY_ECR_REGISTRY is not an ECR registry host: $XRAY_ECR_REGISTRY" >&2; exit 2; }
[[ "$XRAY_ARTIFACT_BUCKET" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || { echo "error: XRAY_ARTIFACT_BUCKET is not an S3 bucket name: $XRAY_ARTIFACT_BUCKET" >&2; exit 2; }

scheduler=()
[ -n "${XRAY_SCHEDULER_ROLE_ARN:-}" ] && scheduler=(--scheduler_role="$XRAY_SCHEDULER_ROLE_ARN")

# A SageMaker MLflow ARN authenticates with the IAM role; an http(s) server needs a token, kept in a
# ZenML secret and referenced, never written into the component or printed.
secret_commands=()
tracker_auth=""
case "$MLFLOW_TRACKING_URI" in
  arn:aws*:sagemaker:*:mlflow-tracking-server/*) ;;
  http://*|https://*)
    [ -n "${MLFLOW_TRACKING_TOKEN:-}" ] || { echo "error: MLFLOW_TRACKING_URI is an http(s) server: set MLFLOW_TRACKING_TOKEN" >&2; exit 2; }
    secret_commands=("zenml secret create ${stack}-mlflow --token=\$MLFLOW_TRACKING_TOKEN")
    tracker_auth="--tracking_token={{${stack}-mlflow.token}}" ;;
  *) echo "error: MLFLOW_TRACKING_URI must be a SageMaker MLflow ARN or an http(s) URL: $MLFLOW_TRACKING_URI" >&2; exit 2 ;;
esac

commands=(
  "${secret_commands[@]}"
  "zenml artifact-store register ${stack}-s3 --flavor=s3 --path=s3://${XRAY_ARTIFACT_BUCKET}/zenml"
  "zenml orchestrator register ${stack}-orchestrator --flavor=sagemaker --execution_role=${XRAY_SAGEMAKER_ROLE_ARN} --region=${AWS_REGION} --bucket=${XRAY_ARTIFACT_BUCKET} ${scheduler[*]:-}"
  "zenml step-operator register sagemaker --flavor=sagemaker --role=${XRAY_SAGEMAKER_ROLE_ARN} --bucket=${XRAY_ARTIFACT_BUCKET}"
  "zenml container-registry register ${stack}-ecr --flavor=aws --uri=${XRAY_ECR_REGISTRY}"
  "zenml image-builder register ${stack}-codebuild --flavor=aws --code_build_project=${XRAY_CODEBUILD_PROJECT}"
  "zenml experiment-tracker register ${stack}-mlflow --flavor=mlflow --tracking_uri=${MLFLOW_TRACKING_URI} ${tracker_auth}"
  "zenml model-registry register ${stack}-mlflow-registry --flavor=mlflow"
  "zenml stack register ${stack} -a ${stack}-s3 -o ${stack}-orchestrator -s sagemaker -c ${stack}-ecr -i ${stack}-codebuild -e ${stack}-mlflow -r ${stack}-mlflow-registry"
)

echo "stack '${stack}' in ${AWS_REGION}:"
for command in "${commands[@]}"; do
  [ -n "$command" ] || continue
  echo "  ${command% }"
  if [ "$dry_run" -eq 0 ]; then
    eval "$command"
  fi
done
if [ "$dry_run" -eq 1 ]; then
  echo "dry run: nothing was registered"
else
  echo "registered; activate it with: zenml stack set ${stack}"
fi
