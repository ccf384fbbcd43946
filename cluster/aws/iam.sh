#!/usr/bin/env bash
# The two instance profiles cluster/aws/alexray-cluster.yaml names, created once per AWS account
# with your own (administrator) credentials; nodes then need no keys at all:
#   alexray-head    S3 on BUCKET + what Ray's autoscaler needs to launch and remove worker nodes
#   alexray-worker  S3 on BUCKET, nothing else
# Re-running it updates the policies (for another bucket, say).
#   cluster/aws/iam.sh BUCKET
set -euo pipefail
bucket=${1:?usage: cluster/aws/iam.sh BUCKET   (the S3 bucket of the shards and the runs)}
here=$(cd "$(dirname "$0")" && pwd)
account=$(aws sts get-caller-identity --query Account --output text)
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
render() { sed -e "s/BUCKET/$bucket/g" -e "s/ACCOUNT/$account/g" "$here/policies/$1"; }

for name in alexray-head alexray-worker; do
  aws iam get-role --role-name "$name" >/dev/null 2>&1 ||
    aws iam create-role --role-name "$name" --assume-role-policy-document "$trust" >/dev/null
  if ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
  aws iam put-role-policy --role-name "$name" --policy-name alexray-s3 --policy-document "$(render s3.json)"
done
aws iam put-role-policy --role-name alexray-head --policy-name alexray-autoscaler \
  --policy-document "$(render autoscaler.json)"
echo "instance profiles alexray-head and alexray-worker ready for s3://$bucket (account $account)"
