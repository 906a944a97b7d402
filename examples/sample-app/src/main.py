# SPDX-License-Identifier: Apache-2.0
import json

TEST_CUSTOMER = {
    "name": "Jane Roe",
    "card": "4111 1111 1111 1111",
    "contact": "jane.roe@corp-mail.net",
}


def main():
    print(json.dumps(TEST_CUSTOMER))


if __name__ == "__main__":
    main()
